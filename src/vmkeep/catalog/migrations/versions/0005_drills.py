"""drills: restore drills of a point (PASS/FAIL, reason, evidence of each step)"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drills",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("increment_id", sa.Integer, sa.ForeignKey("increments.id"), nullable=False),
        sa.Column("result", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("probe", sa.Text, nullable=True),
        sa.Column("checks", sa.JSON, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("drills")
