"""Files of a backup written and read through encryption when a passphrase is configured.

New files are sealed here, in Python (the `cryptography` package), with authenticated encryption
(format "difyops-enc" version 1):
- a header of 40 bytes: b"difyops-enc", the version (1 byte), a random salt (16 bytes), the
  PBKDF2 iteration count (4 bytes, big-endian; 600000) and a random nonce prefix (8 bytes);
- key = PBKDF2-HMAC-SHA256(BACKUP_PASSPHRASE, salt, iterations), 32 bytes;
- then the content in chunks of 1 MiB (the last one shorter, possibly empty), each sealed with
  AES-256-GCM as ciphertext + 16-byte tag, under nonce = prefix + chunk number (4 bytes,
  big-endian) and with the whole header + 1 byte (1 for the last chunk, 0 for the others) as
  associated data.
A wrong passphrase, a changed byte anywhere, chunks reordered or dropped, and a file cut short or
extended all fail authentication, and no byte of a chunk is returned before its tag is checked.
Reading also goes to the end of the file when its user stops early, so a file read without an
error is authenticated to its last byte.

Files written by earlier versions start with openssl's `Salted__`: they are still read, by the
openssl binary (AES-256-CBC, key from PBKDF2-SHA256 with 600000 iterations; the passphrase
reaches openssl through a pipe, never a command line or the environment). That format has no
integrity check of its own, only the manifest's SHA-256 of the file; new files are never written
in it.

By hand, without an inventory, from a checkout of difyops (its virtualenv has `cryptography`):
`python -m tasks.backups.crypto decrypt FILE.enc FILE` writes the content of either format into
a new file, `python -m tasks.backups.crypto check FILE.enc` only reads it through; both take the
passphrase from BACKUP_PASSPHRASE in the environment, else ask for it. A file of the former
format also opens with
`openssl enc -d -aes-256-cbc -pbkdf2 -iter 600000 -md sha256 -in FILE.enc -out FILE`.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from tasks.core.errors import DifyopsError

MAGIC = b"difyops-enc"
VERSION = 1
HEADER = struct.Struct(">11sB16sI8s")  # magic, version, salt, iterations, nonce prefix
ITERATIONS = 600_000
MAX_ITERATIONS = 10 * ITERATIONS  # more: a damaged header (and hours of PBKDF2 to find out)
CHUNK = 1 << 20
TAG = 16
SUFFIX = ".enc"
DESCRIPTION = (f"difyops-enc v{VERSION}: aes-256-gcm in {CHUNK >> 20} MiB chunks, "
               f"pbkdf2-sha256 {ITERATIONS}")
OPENSSL_MAGIC = b"Salted__"
OPENSSL_CIPHER = ["-aes-256-cbc", "-pbkdf2", "-iter", "600000", "-md", "sha256"]


class CryptoError(DifyopsError):
    """Encryption or decryption failed (wrong passphrase, damaged file, no openssl)."""


@dataclass(frozen=True)
class _Key:
    """What seals and opens the chunks of one file: its header, nonce prefix and key."""

    header: bytes
    prefix: bytes
    cipher: AESGCM

    @classmethod
    def derive(cls, header: bytes, passphrase: str) -> _Key:
        """The key of the file with this header: PBKDF2-HMAC-SHA256 under the header's salt."""
        _, _, salt, iterations, prefix = HEADER.unpack(header)
        kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations)
        return cls(header, prefix, AESGCM(kdf.derive(passphrase.encode())))

    def _context(self, index: int, last: bool) -> tuple[bytes, bytes]:
        """The nonce (prefix + chunk number) and associated data (header + last flag)."""
        return self.prefix + index.to_bytes(4, "big"), self.header + bytes([last])

    def seal(self, index: int, plain: bytes, last: bool) -> bytes:
        """Chunk number index encrypted, with its tag."""
        nonce, associated = self._context(index, last)
        return self.cipher.encrypt(nonce, plain, associated)

    def open(self, index: int, sealed: bytes, last: bool) -> bytes:
        """Chunk number index decrypted; InvalidTag when it is not what was sealed there as
        that chunk (or is shorter than a tag)."""
        nonce, associated = self._context(index, last)
        return self.cipher.decrypt(nonce, sealed, associated)


class _Sealing(io.RawIOBase):
    """A writable stream that seals what it is given into out, chunk by chunk; finish() seals
    the last chunk (a file without it is refused as cut short)."""

    def __init__(self, out: BinaryIO, passphrase: str, iterations: int) -> None:
        header = HEADER.pack(MAGIC, VERSION, os.urandom(16), iterations, os.urandom(8))
        self._key = _Key.derive(header, passphrase)
        self._out = out
        self._pending = bytearray()
        self._index = 0
        out.write(header)

    def writable(self) -> bool:
        """Whether the stream takes writes: it does."""
        return True

    def write(self, data: bytes) -> int:
        """Take all of data; every full chunk that is certainly not the last is sealed."""
        self._pending += data
        while len(self._pending) > CHUNK:
            self._seal(bytes(self._pending[:CHUNK]), last=False)
            del self._pending[:CHUNK]
        return len(data)

    def finish(self) -> None:
        """Seal what is left as the last chunk."""
        self._seal(bytes(self._pending), last=True)
        self._pending.clear()

    def _seal(self, plain: bytes, last: bool) -> None:
        """Write the next chunk, sealed, into the file."""
        self._out.write(self._key.seal(self._index, plain, last))
        self._index += 1


class _Opening(io.RawIOBase):
    """A readable stream of the content of a sealed file; each chunk is authenticated before
    any of it is returned, the first one at once (a wrong passphrase fails on opening)."""

    def __init__(self, source: io.BufferedReader, name: str, passphrase: str) -> None:
        self._source = source
        self._name = name
        self._index = 0
        self._ended = False
        self._key = _Key.derive(self._header(), passphrase)
        self._plain = memoryview(self._next_chunk())

    def _header(self) -> bytes:
        """The file's header, checked to be one this module can have written."""
        header = self._source.read(HEADER.size)
        if not header.startswith(MAGIC):
            raise CryptoError(f"{self._name} is not an encrypted backup file (it starts with "
                              f"neither {MAGIC.decode()} nor openssl's {OPENSSL_MAGIC.decode()}):"
                              f" the file is damaged or was tampered with")
        if len(header) < HEADER.size:
            raise CryptoError(f"{self._name} ends inside its header: the file was cut short")
        _, version, _, iterations, _ = HEADER.unpack(header)
        if version != VERSION:
            raise CryptoError(f"{self._name} is in format version {version}, and this difyops "
                              f"reads version {VERSION}: a newer difyops wrote it, or the file "
                              f"is damaged")
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise CryptoError(f"{self._name}: its header asks for {iterations} PBKDF2 "
                              f"iterations (1 to {MAX_ITERATIONS} are accepted): the file is "
                              f"damaged or was tampered with")
        return header

    def _next_chunk(self) -> bytes:
        """The content of the next chunk, authenticated; b"" after the last one. After a
        refusal, reading on is refused too (what follows cannot pass as the refused chunk)."""
        if self._ended:
            return b""
        sealed = self._source.read(CHUNK + TAG)
        last = not self._source.peek(1)
        try:
            plain = self._key.open(self._index, sealed, last)
        except InvalidTag:
            raise CryptoError(self._refusal()) from None
        self._index += 1
        self._ended = last
        return plain

    def _refusal(self) -> str:
        """Why the current chunk is refused, for the operator."""
        if self._index == 0:
            return (f"cannot decrypt {self._name}: wrong BACKUP_PASSPHRASE, or the file is "
                    f"damaged, cut short or was tampered with (its first chunk fails "
                    f"authentication)")
        return (f"cannot decrypt {self._name}: the file is damaged, cut short or was tampered "
                f"with: chunk {self._index + 1} fails authentication (the passphrase is right: "
                f"the {self._index} chunk(s) before it decrypted)")

    def readable(self) -> bool:
        """Whether the stream can be read: it can."""
        return True

    def readinto(self, buffer: memoryview) -> int:
        """Fill buffer from the current chunk, opening the next one when it is used up."""
        while not self._plain and not self._ended:
            self._plain = memoryview(self._next_chunk())
        count = min(len(buffer), len(self._plain))
        buffer[:count] = self._plain[:count]
        self._plain = self._plain[count:]
        return count


def openssl() -> str:
    """The openssl binary, or a clear error."""
    found = shutil.which("openssl")
    if not found:
        raise CryptoError("openssl is not installed on this machine, and backups encrypted by "
                          "earlier versions of difyops need it: install the package openssl")
    return found


def _passphrase_pipe(passphrase: str) -> int:
    """A pipe whose read end yields the passphrase (it fits the pipe buffer)."""
    read_end, write_end = os.pipe()
    os.write(write_end, passphrase.encode() + b"\n")
    os.close(write_end)
    return read_end


def _create(path: Path) -> BinaryIO:
    """A new file, 0600, never one that exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def _drain(stream: BinaryIO) -> None:
    """Read a stream to its end."""
    while stream.read(CHUNK):
        pass


@contextlib.contextmanager
def writer(path: Path, passphrase: str | None, *,
           iterations: int = ITERATIONS) -> Iterator[BinaryIO]:
    """A new file (0600, never an existing one) to write into, sealed on the way when a
    passphrase is given, and fsynced; the last chunk is sealed only when the block ends without
    an error (fewer iterations are for tests)."""
    with _create(path) as out:
        if passphrase is None:
            yield out
        else:
            sealing = _Sealing(out, passphrase, iterations)
            yield cast(BinaryIO, sealing)
            sealing.finish()
        out.flush()
        os.fsync(out.fileno())


@contextlib.contextmanager
def _openssl_reader(name: str, source: BinaryIO, passphrase: str) -> Iterator[BinaryIO]:
    """The content of a file of the former format, decrypted by openssl; read to its end when
    the block ends without an error, and then openssl's verdict (the CBC padding) checked."""
    binary = openssl()
    key_fd = _passphrase_pipe(passphrase)
    process = subprocess.Popen([binary, "enc", "-d", *OPENSSL_CIPHER, "-pass", f"fd:{key_fd}"],
                               stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               pass_fds=(key_fd,))
    os.close(key_fd)
    completed = False
    try:
        yield process.stdout
        _drain(process.stdout)
        completed = True
    finally:
        process.stdout.close()
        if not completed and process.poll() is None:
            process.kill()
        error = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        status = process.wait()
    if status != 0:
        raise CryptoError(f"openssl could not decrypt {name} (wrong BACKUP_PASSPHRASE or a "
                          f"damaged file): {error.splitlines()[-1] if error else status}")


@contextlib.contextmanager
def reader(path: Path, passphrase: str | None) -> Iterator[BinaryIO]:
    """A file to read from, decrypted on the way when a passphrase is given (either format);
    an encrypted file is read to its end when the block ends without an error, so that any
    damage to it raises CryptoError."""
    with path.open("rb") as source:
        if passphrase is None:
            yield source
        elif os.pread(source.fileno(), len(OPENSSL_MAGIC), 0) == OPENSSL_MAGIC:
            # pread leaves the descriptor openssl inherits at the start of the file
            with _openssl_reader(path.name, source, passphrase) as data:
                yield data
        else:
            data = io.BufferedReader(_Opening(source, path.name, passphrase), CHUNK)
            yield data
            _drain(data)


def decrypt_file(source: Path, target: Path, passphrase: str | None) -> None:
    """Decrypt (or copy) a whole file into a new file (0600); the new file is removed again
    when the source cannot be read to its end."""
    created = False
    try:
        with reader(source, passphrase) as data, writer(target, None) as out:
            created = True
            shutil.copyfileobj(data, out, CHUNK)
    except BaseException:
        if created:
            target.unlink(missing_ok=True)
        raise


def check_readable(path: Path, passphrase: str | None) -> None:
    """Read a file to the end through decryption: raises CryptoError when it cannot be read."""
    with reader(path, passphrase) as data:
        _drain(data)


def main(argv: list[str] | None = None) -> int:
    """Decrypt or check one file by hand (see the module's docstring); the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tasks.backups.crypto",
                                     description="Decrypt or check an encrypted backup file. "
                                     "The passphrase comes from BACKUP_PASSPHRASE in the "
                                     "environment, else from a prompt.")
    commands = parser.add_subparsers(dest="command", required=True)
    decrypt = commands.add_parser("decrypt", help="write the content of FILE into OUT, a new "
                                  "file (0600)")
    decrypt.add_argument("file", type=Path, metavar="FILE")
    decrypt.add_argument("out", type=Path, metavar="OUT")
    check = commands.add_parser("check", help="read FILE to its end through decryption, "
                                "writing nothing")
    check.add_argument("file", type=Path, metavar="FILE")
    arguments = parser.parse_args(argv)
    passphrase = os.environ.get("BACKUP_PASSPHRASE") or getpass.getpass("BACKUP_PASSPHRASE: ")
    try:
        if arguments.command == "decrypt":
            decrypt_file(arguments.file, arguments.out, passphrase)
        else:
            check_readable(arguments.file, passphrase)
    except (CryptoError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = f"decrypted into {arguments.out}" if arguments.command == "decrypt" else "readable"
    print(f"{arguments.file}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
