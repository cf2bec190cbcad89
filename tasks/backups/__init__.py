"""Backups of a Dify installation: what to save and from where, how, and how to get it back.

- store.py: the backup folder on the control machine (ids, manifests, states, the lock)
- retention.py: which backups prune keeps (pure arithmetic)
- settings.py: the inventory's backup settings checked before any host is touched
- stream.py: binary streams from and into commands on hosts (pg_dump out, pg_restore in)
- crypto.py: authenticated encryption of files with the backup passphrase (AES-256-GCM)
- postgres.py: consistent dumps with row counts, restores, scratch databases
- engine.py: run, verify, restore (the task module tasks/backup.py stays thin)
- copy.py: the second place (SSH host or S3-compatible bucket)
- schedule.py: the systemd timer / cron line that runs `inv backup.run`
"""
