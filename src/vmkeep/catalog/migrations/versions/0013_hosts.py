"""many hosts: the hosts table, the host each VM lives on, and the host whose daemon must run
a job"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("uri", sa.String(255), nullable=False),
        sa.Column("vmm", sa.String(16), nullable=False),
        sa.Column("vmm_dir", sa.Text, nullable=True),
        sa.Column("vmm_args", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("max_backups", sa.Integer, nullable=True),
        sa.Column("monitor", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("monitored_at", UtcDateTime, nullable=True),
        sa.Column("heartbeat_at", UtcDateTime, nullable=True),
        sa.Column("daemon", sa.JSON, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("host", sa.String(255), nullable=True))
        batch.create_index("ix_vms_host", ["host"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("runs_on", sa.String(255), nullable=True))
        batch.create_index("ix_jobs_runs_on", ["runs_on"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_runs_on")
        batch.drop_column("runs_on")
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_host")
        batch.drop_column("host")
    op.drop_table("hosts")
