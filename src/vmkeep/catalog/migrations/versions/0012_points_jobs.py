"""points you can count on: a backup job's task (backup, prune, verify, drill), when each
increment was last verified and with what result, and group drills (a group restore point
booted together on an isolated network)"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backup_jobs") as batch:
        batch.add_column(sa.Column("task", sa.String(16), nullable=False, server_default="backup"))
    with op.batch_alter_table("increments") as batch:
        batch.add_column(sa.Column("verified_at", UtcDateTime, nullable=True))
        batch.add_column(sa.Column("verify_result", sa.String(8), nullable=True))
    op.create_table(
        "group_drills",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "group_backup_id",
            sa.Integer,
            sa.ForeignKey("group_backups.id"),
            nullable=False,
            index=True,
        ),
        sa.Column("result", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("checks", sa.JSON, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("group_drills")
    with op.batch_alter_table("increments") as batch:
        batch.drop_column("verify_result")
        batch.drop_column("verified_at")
    with op.batch_alter_table("backup_jobs") as batch:
        batch.drop_column("task")
