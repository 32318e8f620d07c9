"""Server X25519 key pairs: the deployment's (one file, made on first start); one per job (forward secrecy).

Every file is the one `flglm.wire.keys.save_private_key` writes and `load_private_key` reads (unencrypted
PKCS#8 PEM, mode 0600, atomic), so the workers load the same files; `flglm.wire.keys` imports no torch.

Per-job keys live in `<data_dir>/job-keys/` (mode 0700) as `job-<id>.key`. The key is created lazily when the
job opens (`backend.jobs.service.transition`), not in the transaction that creates the row: an open acts on
a committed row whose id no other job can ever get (jobs are never deleted), so the file name is never
ambiguous, and exactly one open of a job wins its conditional status update. The file is written and
fsynced *before* that transaction commits, and the row keeps only the public half, so:

- a committed open always has its key file (a crash after the commit cannot lose it);
- a rolled-back open leaves a file that no row publishes: the job is still a draft, and its next open
  deletes that orphan and writes a fresh key (`create_job_key`), so an orphan is never used;
- the public key in the row is computed from the private key that was written, so they always match.

Housekeeping deletes the file a retention period after the job ended (`delete_job_key`); the workers then
refuse the job's messages (`flglm.contracts.refusals.JobKeyDeleted`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.wire.keys import generate_private_key, load_private_key, public_key_to_b64, save_private_key

log = logging.getLogger(__name__)

JOB_KEYS_DIR_MODE = 0o700


def load_or_create_server_key(path: Path) -> X25519PrivateKey:
    """The key in `path`, created when missing; refuses a file others can access (InsecureKeyFileError).

    Processes starting together all end up with the one key that was created first.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process created it a moment ago: use theirs
            save_private_key(generate_private_key(), path, replace=False)
    return load_private_key(path)


def public_key_b64(private_key: X25519PrivateKey) -> str:
    """Raw 32-byte public key in standard base64, as the control plane publishes it."""
    return public_key_to_b64(private_key.public_key())


def job_key_path(keys_dir: Path, job_id: int) -> Path:
    """Where job `job_id`'s server private key lives (the path the workers get in the job's spec)."""
    return keys_dir / f"job-{job_id}.key"


def create_job_key(keys_dir: Path, job_id: int) -> str:
    """Write a fresh key pair's private half for `job_id` (0600, atomic, no-replace) and return its public
    half (base64). The caller stores the public half in the job row in the same transaction.

    Call it only from the one transaction that won the job's open, whose row has no public key yet: a file
    already there is then an orphan of an open that rolled back (no row publishes it), and is replaced.
    """
    keys_dir.mkdir(mode=JOB_KEYS_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(keys_dir, JOB_KEYS_DIR_MODE)  # mkdir's mode is narrowed by the umask and ignored if it exists
    path = job_key_path(keys_dir, job_id)
    if path.exists():
        log.warning("job %s: deleting the unpublished key file of an open that rolled back", job_id)
        path.unlink(missing_ok=True)
    private_key = generate_private_key()
    save_private_key(private_key, path, replace=False)
    return public_key_b64(private_key)


def delete_job_key(keys_dir: Path, job_id: int) -> bool:
    """Delete job `job_id`'s private key file; False when it was already gone."""
    try:
        job_key_path(keys_dir, job_id).unlink()
    except FileNotFoundError:
        return False
    return True
