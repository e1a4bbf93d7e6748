"""Database models and migrations (SQLAlchemy, Alembic)."""
