"""jobs: origin, who, params, result, error code, byte progress, cancel request, start/end times"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("origin", sa.String(16), nullable=False, server_default="cli"))
        batch.add_column(sa.Column("who", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("params", sa.JSON, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("result", sa.JSON, nullable=True))
        batch.add_column(sa.Column("error_code", sa.String(64), nullable=True))
        batch.add_column(sa.Column("done_bytes", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("total_bytes", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("started_at", UtcDateTime, nullable=True))
        batch.add_column(sa.Column("finished_at", UtcDateTime, nullable=True))
    op.create_index("ix_jobs_state", "jobs", ["state", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for col in (
            "origin",
            "who",
            "params",
            "result",
            "error_code",
            "done_bytes",
            "total_bytes",
            "cancel_requested",
            "started_at",
            "finished_at",
        ):
            batch.drop_column(col)
