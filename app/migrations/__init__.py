"""Alembic revisions of the store's schema (env.py runs them; app/migrate.py decides when)."""
