"""Who submitted a job: a hash of the client's bearer token, or its address (per-client quotas).

Revision ID: 0003
Revises: 0002
Create Date: 2025-06-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("client", sa.String(64)))
        batch.create_index("ix_jobs_client", ["client"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_client")
        batch.drop_column("client")
