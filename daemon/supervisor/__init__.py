"""The daemon process: watches the inbox, owns the spool, starts and supervises trainers. Never imports torch."""
