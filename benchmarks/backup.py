"""Benchmark: backup, verify and restore of a generated database of 1 GB or more, side by side
with the original plan's backup.sh (`pg_dump > file.sql`, restored with `psql < file.sql`).

Prints figures; asserts nothing. It needs a Docker engine: it starts two lab hosts (the same
container hosts as the integration tests), deploys PostgreSQL with `inv db.deploy`, fills the
`dify` database with generated rows (text that compresses about 2:1, like chat messages, with a
primary key and an index), then measures, from this machine (the control machine):
- difyops: `inv backup.run --skip-verify` (pg_dump -Fc of both databases with row counts,
  streamed over SSH, plus storage, plugin data and config), `inv backup.verify` (checksums and a
  scratch restore with row counts), `inv backup.restore ID` (restore into a new database, row
  counts, swap);
- seed: on the db host, `pg_dump -h localhost -U dify -d dify > file.sql` and `psql < file.sql`
  into a new database (what backup.sh does, and how its file would be restored).
Both run on the same machine and disk; the seed's file stays on the db host while difyops
streams to the control machine. Other work on the machine shifts the figures: compare ratios.

Run: python benchmarks/backup.py [--size-gb 1.0] [--compression 0-9] [--encrypt none|secrets|all]
     [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.lab import Lab, LabHost  # noqa: E402

PASSPHRASE = "benchmark-passphrase-0123456789"
GENERATE = """
CREATE TABLE IF NOT EXISTS messages (
    id bigint PRIMARY KEY,
    conversation_id uuid NOT NULL,
    query text NOT NULL,
    answer text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO messages (id, conversation_id, query, answer)
SELECT i, md5((i / 20)::text)::uuid, 'question ' || md5(i::text) || ' ' || md5((i * 7)::text),
       (SELECT string_agg(md5((i * 31 + k)::text), ' ') FROM generate_series(1, 24) AS k)
FROM generate_series({start}, {stop}) AS i;
"""
INDEX = "CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id);"
ROWS_PER_BATCH = 200_000


class Bench:
    """The lab hosts, the inventory and the commands the benchmark runs."""

    def __init__(self, folder: Path, db: LabHost, app: LabHost, encrypt: str,
                 compression: int) -> None:
        self.folder, self.db, self.app = folder, db, app
        self.secrets = folder / "bench.env"
        self.backups = folder / "backups"
        data = {"name": "bench", "cache": {"mode": "standalone"}, "vector": {"store": "pgvector"},
                "backup": {"dir": str(self.backups), "encrypt": encrypt,
                           "dump_compression": compression},
                "net": {"firewall": "off"},
                "hosts": [db.inventory_entry(["db_primary", "cache"]),
                          app.inventory_entry(["api", "worker", "beat", "web", "plugin_daemon",
                                               "lb"])]}
        self.inventory = folder / "bench.yml"
        self.inventory.write_text(yaml.safe_dump(data))
        self.secrets.write_text(f"BACKUP_PASSPHRASE={PASSPHRASE}\n" if encrypt != "none"
                                else "")
        self.secrets.chmod(0o600)

    def inv(self, *args: str) -> str:
        env = {**os.environ, "DIFY_INVENTORY": str(self.inventory),
               "DIFY_SECRETS": str(self.secrets)}
        result = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                                text=True, capture_output=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"inv {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def password(self) -> str:
        return next(line.split("=", 1)[1] for line in self.secrets.read_text().splitlines()
                    if line.startswith("DB_PASSWORD="))

    def on_db(self, command: str) -> str:
        code, out = self.db.exec(command)
        if code != 0:
            raise SystemExit(f"on {self.db.name}: {command[:200]} failed:\n{out[-2000:]}")
        return out

    def as_dify(self, sql: str, database: str = "dify") -> str:
        return self.on_db(f"PGPASSWORD='{self.password()}' psql -h 127.0.0.1 -U dify -d "
                          f"{database} -X -q -At -v ON_ERROR_STOP=1 <<'SQL'\n{sql}\nSQL")

    def as_postgres(self, sql: str) -> str:
        return self.on_db(f"runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 "
                          f"<<'SQL'\n{sql}\nSQL")


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def generate(bench: Bench, size_gb: float) -> tuple[int, int, float]:
    """Fill dify.messages until the database reaches the size; (rows, bytes, seconds)."""
    target = int(size_gb * 1024**3)
    rows, start = 0, time.perf_counter()
    while True:
        size = int(bench.as_dify("SELECT pg_database_size('dify');"))
        if size >= target:
            break
        bench.as_dify(GENERATE.format(start=rows + 1, stop=rows + ROWS_PER_BATCH))
        rows += ROWS_PER_BATCH
        if rows == ROWS_PER_BATCH:
            bench.as_dify(INDEX)
        print(f"  generated {rows} rows, database {size / 1e9:.2f} GB", flush=True)
    bench.as_dify("ANALYZE messages;")
    return rows, size, time.perf_counter() - start


def main() -> None:
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="size of the generated dify database (default 1.0)")
    parser.add_argument("--encrypt", choices=("none", "secrets", "all"), default="none",
                        help="backup.encrypt for the difyops run (default none)")
    parser.add_argument("--compression", type=int, default=1,
                        help="backup.dump_compression, pg_dump -Z for difyops (default 1)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the lab hosts and files afterwards (for a look)")
    options = parser.parse_args()
    lab = Lab()
    folder = Path(tempfile.mkdtemp(prefix="difyops-bench-backup-"))
    try:
        db, app = lab.start(["bench-db", "bench-app"])
        bench = Bench(folder, db, app, options.encrypt, options.compression)
        bench.inv("config.secrets")
        print("deploying PostgreSQL with inv db.deploy ...", flush=True)
        bench.inv("db.deploy")
        app.exec("mkdir -p /srv/dify/storage/privkeys/t /opt/dify/plugin_daemon && "
                 "head -c 1000000 /dev/urandom > /srv/dify/storage/privkeys/t/private.pem")
        print(f"generating a database of {options.size_gb:g} GB ...", flush=True)
        rows, size, seconds = generate(bench, options.size_gb)
        print(f"  {rows} rows, {size / 1e9:.2f} GB in {seconds:.0f} s\n", flush=True)

        # The seed's backup.sh and the restore its file allows, on the db host.
        password = bench.password()
        seed_dump, _ = timed(lambda: bench.on_db(
            f"mkdir -p /var/tmp/seed && PGPASSWORD='{password}' pg_dump -h localhost -U dify "
            f"-d dify > /var/tmp/seed/database.sql"))
        seed_size = int(bench.on_db("stat -c %s /var/tmp/seed/database.sql"))
        bench.as_postgres("DROP DATABASE IF EXISTS seed_restore; "
                          "CREATE DATABASE seed_restore OWNER dify;")
        seed_restore, _ = timed(lambda: bench.on_db(
            f"PGPASSWORD='{password}' psql -q -h localhost -U dify -d seed_restore "
            f"-v ON_ERROR_STOP=1 < /var/tmp/seed/database.sql > /dev/null"))
        bench.as_postgres("DROP DATABASE seed_restore;")
        bench.on_db("rm -rf /var/tmp/seed")

        # difyops
        ours_backup, _ = timed(lambda: bench.inv("backup.run", "--skip-verify"))
        (backup_id,) = [p.name for p in bench.backups.iterdir() if p.name[0].isdigit()]
        manifest = json.loads((bench.backups / backup_id / "manifest.json").read_text())
        ours_size = sum(entry["size"] for entry in manifest["files"])
        dump_size = sum(entry["size"] for entry in manifest["files"]
                        if entry["path"].startswith("db/"))
        ours_verify, _ = timed(lambda: bench.inv("backup.verify", "--backup-id", backup_id))
        ours_restore, _ = timed(lambda: bench.inv("backup.restore", backup_id))

        width = 34
        load = os.getloadavg()[0]
        print(f"database: {rows} rows in dify.messages, {size / 1e9:.2f} GB on disk "
              f"(pg_dump -Z {options.compression}, encrypt: {options.encrypt}); "
              f"{os.cpu_count()} CPUs, load average {load:.1f} at the end")
        print(f"{'':{width}}{'difyops':>12}{'seed':>12}{'ratio':>9}")
        print(f"{'backup time (s)':{width}}{ours_backup:>12.1f}{seed_dump:>12.1f}"
              f"{ours_backup / seed_dump:>9.2f}")
        print(f"{'backup size (MB), all files':{width}}{ours_size / 1e6:>12.1f}"
              f"{seed_size / 1e6:>12.1f}{ours_size / seed_size:>9.2f}")
        print(f"{'  of which the two dumps (MB)':{width}}{dump_size / 1e6:>12.1f}"
              f"{seed_size / 1e6:>12.1f}{dump_size / seed_size:>9.2f}")
        print(f"{'verify time (s) [seed: none;':{width}}{ours_verify:>12.1f}"
              f"{seed_restore:>12.1f}{ours_verify / seed_restore:>9.2f}")
        print(f"{'  vs a psql restore of its file]':{width}}")
        print(f"{'restore time (s)':{width}}{ours_restore:>12.1f}{seed_restore:>12.1f}"
              f"{ours_restore / seed_restore:>9.2f}")
        print("difyops: both databases, storage, plugin data and config, row counts per table, "
              "SHA-256 per file, streamed to this machine; verify = checksums + scratch restore "
              "+ row counts; restore = new database, row counts, swap (app stopped around it).")
        print("seed: one database (dify) as plain SQL on the db host, never checked.")
    finally:
        if options.keep:
            print(f"kept: network {lab.network_name}, files {folder}")
        else:
            lab.close()
            subprocess.run(["rm", "-rf", str(folder)], check=False)


if __name__ == "__main__":
    main()
