"""Files of a backup written and read through encryption when a passphrase is configured.

openssl (a dependency of ca-certificates, so on practically every Debian machine) encrypts with
AES-256-CBC under a key derived from BACKUP_PASSPHRASE by PBKDF2-SHA256 (600000 iterations,
random salt). The passphrase reaches openssl through a pipe, never a command line or the
environment. Integrity comes from the manifest's SHA-256 of the encrypted file, checked before
anything is decrypted for a restore. By hand:
`openssl enc -d -aes-256-cbc -pbkdf2 -iter 600000 -md sha256 -in FILE.enc -out FILE`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tasks.core.errors import DifyopsError

CIPHER = ["-aes-256-cbc", "-pbkdf2", "-iter", "600000", "-md", "sha256"]
SUFFIX = ".enc"
DESCRIPTION = "openssl aes-256-cbc pbkdf2-sha256 600000"


class CryptoError(DifyopsError):
    """Encryption or decryption failed (no openssl, wrong passphrase, damaged file)."""


def openssl() -> str:
    """The openssl binary, or a clear error."""
    found = shutil.which("openssl")
    if not found:
        raise CryptoError("openssl is not installed on this machine, and backup.encrypt needs "
                          "it: install the package openssl")
    return found


def _passphrase_pipe(passphrase: str) -> int:
    """A pipe whose read end yields the passphrase (it fits the pipe buffer)."""
    read_end, write_end = os.pipe()
    os.write(write_end, passphrase.encode() + b"\n")
    os.close(write_end)
    return read_end


def _create(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


@contextlib.contextmanager
def writer(path: Path, passphrase: str | None) -> Iterator[BinaryIO]:
    """A new file (0600) to write into; encrypted on the way when a passphrase is given."""
    if passphrase is None:
        with _create(path) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        return
    binary = openssl()
    key_fd = _passphrase_pipe(passphrase)
    with _create(path) as out:
        process = subprocess.Popen([binary, "enc", "-e", *CIPHER, "-salt", "-pass",
                                    f"fd:{key_fd}"], stdin=subprocess.PIPE, stdout=out,
                                   stderr=subprocess.PIPE, pass_fds=(key_fd,))
        os.close(key_fd)
        try:
            yield process.stdin
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            if not process.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    process.stdin.close()
        error = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        if process.wait() != 0:
            raise CryptoError(f"openssl could not encrypt {path.name}: {error}")
        out.flush()
        os.fsync(out.fileno())


@contextlib.contextmanager
def reader(path: Path, passphrase: str | None) -> Iterator[BinaryIO]:
    """A file to read from; decrypted on the way when a passphrase is given."""
    if passphrase is None:
        with path.open("rb") as handle:
            yield handle
        return
    binary = openssl()
    key_fd = _passphrase_pipe(passphrase)
    with path.open("rb") as source:
        process = subprocess.Popen([binary, "enc", "-d", *CIPHER, "-pass", f"fd:{key_fd}"],
                                   stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   pass_fds=(key_fd,))
        os.close(key_fd)
        completed = False
        try:
            yield process.stdout
            completed = process.stdout.read(1) == b""
        finally:
            process.stdout.close()
            if not completed and process.poll() is None:
                process.kill()
            error = process.stderr.read().decode(errors="replace").strip()
            process.stderr.close()
            status = process.wait()
        if completed and status != 0:
            raise CryptoError(f"openssl could not decrypt {path.name} (wrong BACKUP_PASSPHRASE "
                              f"or a damaged file): {error.splitlines()[-1] if error else status}")


def decrypt_file(source: Path, target: Path, passphrase: str | None) -> None:
    """Decrypt (or copy) a whole file to a new file (0600)."""
    with reader(source, passphrase) as data, _create(target) as out:
        shutil.copyfileobj(data, out, 1 << 20)


def check_readable(path: Path, passphrase: str | None) -> None:
    """Read a file to the end through decryption: raises CryptoError when it cannot be read."""
    with reader(path, passphrase) as data:
        while data.read(1 << 20):
            pass
