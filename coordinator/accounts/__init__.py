"""Accounts: named API keys, per-key limits, and a usage ledger that charges exactly once.

* :mod:`.keys` — a key's values: its name, its secret's hash, its limits, its state;
  secrets are made here and only their SHA-256 is kept.
* :mod:`.limits` — the limits as pure arithmetic: token buckets for requests and
  tokens per minute, in-flight counts, budgets per calendar window.
* :mod:`.ledger` — reservations and their one settlement each, pure.
* :mod:`.store` — where keys and the ledger are kept: SQLite (one instance,
  :mod:`.sqlite`) or Redis (several, :mod:`.redis`).
* :mod:`.service` — :class:`~.service.Accounts`, what the HTTP edge asks: who is this
  key, may it send this request now, what did the request cost.

docs/accounts.md says what an operator sees and the ledger's exactly-once argument.
"""
