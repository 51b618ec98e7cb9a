"""API keys with query budgets and rate limits, in SQLite: a cheap, real layer of extraction defense.

Keys are random 192-bit tokens shown once; only their SHA-256 is stored (a slow password hash buys nothing for
high-entropy random tokens). Budgets are reserved with one conditional UPDATE, so concurrent requests can never
overspend a key. The audit log keeps query counts per key and time window, never the inputs.
"""

import hashlib
import os
import secrets
import sqlite3
import threading
import time

from toolkit.errors import UserError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT, hash TEXT UNIQUE NOT NULL, budget INTEGER NOT NULL, used INTEGER NOT NULL,
    rate REAL, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, window INTEGER NOT NULL, queries INTEGER NOT NULL, requests INTEGER NOT NULL,
    PRIMARY KEY (key_id, window));
"""


def _digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """``add`` / ``list`` / ``revoke`` for operators; ``authenticate`` / ``reserve`` for the server."""

    def __init__(self, path, window_seconds=60):
        self.path, self.window_seconds = str(path), int(window_seconds)
        self._lock = threading.Lock()
        try:
            import pathlib

            db = pathlib.Path(self.path)
            db.parent.mkdir(parents=True, exist_ok=True)
            if not db.exists():  # key hashes and budgets: readable by the operator only (sqlite's -wal/-shm copy it)
                os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
            if db.stat().st_mode & 0o077:
                os.chmod(db, 0o600)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a server crash, no fsync per query
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise UserError(f"{self.path}: cannot open the key database ({exc})") from None

    def add(self, budget, rate=None, name=None):
        """A new key: returns (id, secret); the secret is not stored and cannot be shown again."""
        if budget < 1:
            raise UserError(f"--budget must be a positive number of queries, got {budget}")
        if rate is not None and rate <= 0:
            raise UserError(f"--rate must be positive (queries per second), got {rate}")
        key_id, secret = secrets.token_hex(4), "mtk_" + secrets.token_urlsafe(24)
        with self._lock:
            self._db.execute("INSERT INTO keys (id, name, hash, budget, used, rate, created) VALUES (?, ?, ?, ?, 0, ?, ?)",
                             (key_id, name, _digest(secret), int(budget), rate, time.time()))
        return key_id, secret

    def list(self):
        rows = self._db.execute("SELECT id, name, budget, used, rate, revoked, created FROM keys ORDER BY created")
        return [dict(zip(("id", "name", "budget", "used", "rate", "revoked", "created"), r)) for r in rows]

    def revoke(self, key_id):
        with self._lock:
            if self._db.execute("UPDATE keys SET revoked = 1 WHERE id = ?", (key_id,)).rowcount != 1:
                raise UserError(f"no key with id {key_id!r} (mtk keys list)")

    def authenticate(self, secret):
        """The key's row (dict) for a presented secret, or None; revoked keys authenticate (the server answers 403)."""
        if not secret:
            return None
        row = self._db.execute("SELECT id, budget, used, rate, revoked FROM keys WHERE hash = ?",
                               (_digest(secret),)).fetchone()
        return dict(zip(("id", "budget", "used", "rate", "revoked"), row)) if row else None

    def reserve(self, key_id, queries):
        """Atomically spends ``queries`` of the key's budget; False (nothing spent) when they do not fit."""
        with self._lock, self._db:  # one transaction: the spend and its audit row land together
            self._db.execute("BEGIN IMMEDIATE")
            ok = self._db.execute("UPDATE keys SET used = used + ? WHERE id = ? AND revoked = 0 AND used + ? <= budget",
                                  (queries, key_id, queries)).rowcount == 1
            if ok:
                window = int(time.time() // self.window_seconds) * self.window_seconds
                self._db.execute("INSERT INTO usage (key_id, window, queries, requests) VALUES (?, ?, ?, 1) "
                                 "ON CONFLICT (key_id, window) DO UPDATE SET queries = queries + excluded.queries, "
                                 "requests = requests + 1", (key_id, window, queries))
        return ok

    def refund(self, key_id, queries):
        """Gives back a reservation the server could not answer (an internal failure, never bad input)."""
        with self._lock:
            self._db.execute("UPDATE keys SET used = MAX(0, used - ?) WHERE id = ?", (queries, key_id))

    def usage(self, key_id=None):
        """The audit log: (key id, window start, queries, requests) rows."""
        sql = "SELECT key_id, window, queries, requests FROM usage"
        rows = self._db.execute(sql + (" WHERE key_id = ?" if key_id else "") + " ORDER BY window",
                                (key_id,) if key_id else ())
        return [dict(zip(("key_id", "window", "queries", "requests"), r)) for r in rows]

    def remaining(self, key_id):
        row = self._db.execute("SELECT budget - used FROM keys WHERE id = ?", (key_id,)).fetchone()
        return row[0] if row else 0


class RateLimiter:
    """Token bucket per key: ``rate`` queries per second, bursts up to max(rate, burst)."""

    def __init__(self, burst=256):
        self.burst, self._buckets, self._lock = burst, {}, threading.Lock()

    def allow(self, key_id, rate, queries):
        if rate is None:
            return True
        capacity = max(float(rate), float(self.burst))
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * float(rate))
            if tokens < queries:
                self._buckets[key_id] = (tokens, now)
                return False
            self._buckets[key_id] = (tokens - queries, now)
            return True
