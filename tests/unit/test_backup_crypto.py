"""Encrypted backup files: authenticated chunks refuse any wrong passphrase or change; files of
the former openssl format still read."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.backups import crypto

RIGHT = "the-right-passphrase-123"
FAST = 1000  # PBKDF2 iterations for tests (the header records them; production uses 600000)
CHUNK, TAG, HEADER = crypto.CHUNK, crypto.TAG, crypto.HEADER.size
SEALED = CHUNK + TAG  # a full chunk in the file


def seal(path: Path, data: bytes, passphrase: str = RIGHT) -> Path:
    """data written through the writer in pieces of odd sizes, as a download does."""
    with crypto.writer(path, passphrase, iterations=FAST) as sink:
        for start in range(0, len(data), 65521):
            sink.write(data[start:start + 65521])
    return path


def tampered(path: Path, content: bytes) -> Path:
    """A copy of an encrypted file with other bytes."""
    copy = path.with_name(f"tampered-{path.name}")
    copy.write_bytes(content)
    return copy


def flipped(path: Path, offset: int) -> Path:
    """A copy of a file with one byte changed."""
    content = bytearray(path.read_bytes())
    content[offset] ^= 0x01
    return tampered(path, bytes(content))


def refused(path: Path, passphrase: str = RIGHT) -> str:
    """The CryptoError reading the file to its end gives; it names the file."""
    with pytest.raises(crypto.CryptoError) as caught:
        crypto.check_readable(path, passphrase)
    assert path.name in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 5])
def test_round_trip(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = seal(tmp_path / "f.enc", data)
    chunks = max(1, -(-size // CHUNK))
    assert path.stat().st_size == HEADER + chunks * TAG + size
    with crypto.reader(path, RIGHT) as source:
        assert source.read() == data
    with crypto.reader(path, RIGHT) as source:
        assert b"".join(iter(lambda: source.read(100_000), b"")) == data
    crypto.decrypt_file(path, tmp_path / "f", RIGHT)
    assert (tmp_path / "f").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600


def test_encryption_hides_the_content_and_records_its_parameters(tmp_path: Path) -> None:
    secret = b"SECRET_KEY=sk-not-a-real-key\n" * 1000
    with crypto.writer(tmp_path / "c.enc", RIGHT) as sink:
        sink.write(secret)
    stored = (tmp_path / "c.enc").read_bytes()
    assert b"SECRET_KEY" not in stored
    magic, version, _, iterations, _ = crypto.HEADER.unpack(stored[:HEADER])
    assert (magic, version, iterations) == (b"difyops-enc", 1, 600_000)
    assert stat.S_IMODE((tmp_path / "c.enc").stat().st_mode) == 0o600
    with crypto.reader(tmp_path / "c.enc", RIGHT) as source:
        assert source.read() == secret


def test_a_wrong_passphrase_is_always_refused(tmp_path: Path) -> None:
    path = seal(tmp_path / "c.enc", b"SECRET_KEY=sk-not-a-real-key\n")
    for attempt in range(300):
        message = refused(path, f"a-wrong-passphrase-{attempt}")
        assert "wrong BACKUP_PASSPHRASE" in message


def test_a_changed_byte_anywhere_is_refused(tmp_path: Path) -> None:
    path = seal(tmp_path / "c.enc", os.urandom(2 * CHUNK + 100))
    for offset in range(HEADER):
        refused(flipped(path, offset))
    assert "first chunk fails" in refused(flipped(path, HEADER + 10))  # the first chunk's data
    assert "wrong BACKUP_PASSPHRASE" in refused(flipped(path, HEADER + SEALED - 1))  # its tag
    message = refused(flipped(path, HEADER + SEALED + 10))
    assert "chunk 2 fails authentication (the passphrase is right" in message
    refused(flipped(path, path.stat().st_size - 1))  # the last chunk's tag


def test_no_byte_of_a_damaged_chunk_is_returned(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    path = flipped(seal(tmp_path / "c.enc", data), HEADER + SEALED + 10)
    received = bytearray()
    with pytest.raises(crypto.CryptoError), crypto.reader(path, RIGHT) as source:
        while block := source.read(4096):
            received.extend(block)
    assert bytes(received) == data[:CHUNK]


@pytest.mark.parametrize("size", [1, CHUNK, 2 * CHUNK + 100])
def test_a_file_cut_short_or_extended_is_refused(tmp_path: Path, size: int) -> None:
    path = seal(tmp_path / "c.enc", os.urandom(size))
    content = path.read_bytes()
    last = HEADER + (size - 1) // CHUNK * SEALED  # where the last chunk begins
    cuts = {"last chunk dropped": last, "mid-chunk": len(content) - 7, "header only": HEADER,
            "inside the header": HEADER - 3}
    for cut in cuts.values():
        refused(tampered(path, content[:cut]))
    refused(tampered(path, content + b"\0"))
    refused(tampered(path, content + content[HEADER:]))


def test_reordered_chunks_are_refused(tmp_path: Path) -> None:
    path = seal(tmp_path / "c.enc", os.urandom(3 * CHUNK))
    content = path.read_bytes()
    first, second = (content[HEADER + i * SEALED:HEADER + (i + 1) * SEALED] for i in (0, 1))
    swapped = content[:HEADER] + second + first + content[HEADER + 2 * SEALED:]
    refused(tampered(path, swapped))


def test_a_chunk_from_another_file_is_refused(tmp_path: Path) -> None:
    one = seal(tmp_path / "one.enc", b"x" * (2 * CHUNK)).read_bytes()
    two = seal(tmp_path / "two.enc", b"x" * (2 * CHUNK)).read_bytes()
    refused(tampered(tmp_path / "one.enc", one[:HEADER + SEALED] + two[HEADER + SEALED:]))


def test_stopping_early_still_authenticates_the_rest(tmp_path: Path) -> None:
    path = seal(tmp_path / "c.enc", os.urandom(3 * CHUNK))
    damaged = flipped(path, path.stat().st_size - 1)
    with pytest.raises(crypto.CryptoError, match="chunk 3 fails"), \
            crypto.reader(damaged, RIGHT) as source:
        source.read(10)
    with pytest.raises(KeyError), crypto.reader(damaged, RIGHT) as source:
        source.read(10)
        raise KeyError("the user's own error is not replaced")


def test_reading_on_after_a_refusal_is_refused_again(tmp_path: Path) -> None:
    path = flipped(seal(tmp_path / "c.enc", os.urandom(CHUNK + 10)), -1)
    with pytest.raises(crypto.CryptoError), crypto.reader(path, RIGHT) as source:
        for _ in range(2):
            with pytest.raises(crypto.CryptoError, match="chunk 2 fails"):
                source.read()


def test_a_block_that_fails_leaves_a_file_that_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.enc"
    with pytest.raises(KeyError), crypto.writer(path, RIGHT, iterations=FAST) as sink:
        sink.write(os.urandom(2 * CHUNK))
        raise KeyError("interrupted")
    refused(path)


def test_the_engine_streams_tar_gz_archives_through_it(tmp_path: Path) -> None:
    members = {f"m{n}": os.urandom(300_000) for n in range(8)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    path = seal(tmp_path / "a.tar.gz.enc", buffer.getvalue())
    with crypto.reader(path, RIGHT) as source, tarfile.open(fileobj=source, mode="r|gz") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar} == members


def test_files_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    for passphrase in (None, RIGHT):
        path = tmp_path / f"f-{passphrase}"
        with crypto.writer(path, passphrase, iterations=FAST) as sink:
            sink.write(b"data")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with crypto.reader(path, passphrase) as source:
            assert source.read() == b"data"
        with pytest.raises(FileExistsError), crypto.writer(path, passphrase, iterations=FAST):
            pass
        with pytest.raises(FileExistsError):
            crypto.decrypt_file(path, path, passphrase)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with crypto.reader(path, passphrase) as source:
            assert source.read() == b"data"


def test_decrypting_a_damaged_file_leaves_no_output(tmp_path: Path) -> None:
    path = flipped(seal(tmp_path / "c.enc", os.urandom(2 * CHUNK)), HEADER + SEALED + 10)
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt_file(path, tmp_path / "out", RIGHT)
    assert not (tmp_path / "out").exists()


def openssl_encrypt(data: bytes, *options: str) -> bytes:
    """data encrypted by the openssl binary as the former writer did (the passphrase on fd 0)."""
    read_end, write_end = os.pipe()
    os.write(write_end, RIGHT.encode() + b"\n")
    os.close(write_end)
    try:
        return subprocess.run(["openssl", "enc", "-e", *crypto.OPENSSL_CIPHER, *options,
                               "-pass", f"fd:{read_end}"], input=data, capture_output=True,
                              pass_fds=(read_end,), check=True).stdout
    finally:
        os.close(read_end)


def test_files_of_the_former_openssl_format_still_read(tmp_path: Path) -> None:
    data = os.urandom(CHUNK + 12345)
    path = tmp_path / "old.enc"
    path.write_bytes(openssl_encrypt(data, "-salt"))
    assert path.read_bytes().startswith(b"Salted__")
    with crypto.reader(path, RIGHT) as source:
        assert source.read() == data
    with crypto.reader(path, RIGHT) as source:
        assert source.read(10) == data[:10]
    crypto.decrypt_file(path, tmp_path / "old", RIGHT)
    assert (tmp_path / "old").read_bytes() == data


def test_a_wrong_passphrase_for_the_former_format(tmp_path: Path) -> None:
    # a fixed salt (openssl then leaves the header to its caller) makes the outcome certain:
    # this wrong passphrase's CBC padding is invalid (1 in 256 would not be, hence the new format)
    salt = bytes.fromhex("0011223344556677")
    path = tmp_path / "old.enc"
    path.write_bytes(b"Salted__" + salt + openssl_encrypt(b"SECRET_KEY=x\n", "-S", salt.hex()))
    with crypto.reader(path, RIGHT) as source:
        assert source.read() == b"SECRET_KEY=x\n"
    assert "wrong BACKUP_PASSPHRASE" in refused(path, "a-wrong-passphrase-4567")


def test_decrypt_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path = seal(tmp_path / "c.enc", b"content")
    monkeypatch.setenv("BACKUP_PASSPHRASE", RIGHT)
    assert crypto.main(["decrypt", str(path), str(tmp_path / "c")]) == 0
    assert (tmp_path / "c").read_bytes() == b"content"
    assert crypto.main(["check", str(path)]) == 0
    monkeypatch.delenv("BACKUP_PASSPHRASE")
    monkeypatch.setattr(crypto.getpass, "getpass", lambda prompt: "a-wrong-passphrase-4567")
    assert crypto.main(["check", str(path)]) == 1
    assert "wrong BACKUP_PASSPHRASE" in capsys.readouterr().err
