"""protected restore points and notes: an increment may be protected (never pruned, never
deleted without an admin's force) and may carry a note"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("increments") as batch:
        batch.add_column(
            sa.Column("protected", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("note", sa.Text, nullable=True))
        batch.add_column(sa.Column("protected_by", sa.String(255), nullable=True))
        batch.add_column(sa.Column("protected_at", UtcDateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("increments") as batch:
        for col in ("protected_at", "protected_by", "note", "protected"):
            batch.drop_column(col)
