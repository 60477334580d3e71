"""the start of the process holding a lock or running a job (clock ticks since boot): a pid
reused by another process no longer passes for the dead holder"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("locks", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("pid_start", sa.BigInteger, nullable=True))


def downgrade() -> None:
    for table in ("jobs", "locks"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("pid_start")
