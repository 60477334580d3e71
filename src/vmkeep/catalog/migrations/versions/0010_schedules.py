"""schedules: pools, backup jobs and their runs (one row per fired slot), job priority, limits'
wait reasons, the notification outbox, and the claim counter that serialises claims"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("backup_config", sa.JSON, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "backup_jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("selector", sa.JSON, nullable=False),
        sa.Column("datastore", sa.String(255), nullable=False),
        sa.Column("copy_to", sa.String(255), nullable=True),
        sa.Column("schedule", sa.String(255), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("execution", sa.String(16), nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("repeat_missed", sa.Boolean, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("active_since", UtcDateTime, nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
    )
    op.create_table(
        "backup_job_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("backup_job_id", sa.Integer, sa.ForeignKey("backup_jobs.id"), nullable=False),
        sa.Column("slot_at", UtcDateTime, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("who", sa.String(255), nullable=False),
        sa.Column("skipped", sa.JSON, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("backup_job_id", "slot_at", name="uq_backup_job_runs_slot"),
        sqlite_autoincrement=True,  # jobs keep a deleted run's id: it must never come back
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="50"))
        batch.add_column(sa.Column("wait_reason", sa.Text, nullable=True))
        batch.add_column(sa.Column("datastore", sa.String(255), nullable=True))
        batch.add_column(sa.Column("run_id", sa.Integer, nullable=True))
    op.create_index("ix_jobs_run_id", "jobs", ["run_id"])
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", UtcDateTime, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("sent_at", UtcDateTime, nullable=True),
    )
    op.create_index("ix_notifications_state", "notifications", ["state", "next_at"])
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(counters, [{"name": "claim", "value": 0}])


def downgrade() -> None:
    op.drop_table("counters")
    op.drop_index("ix_notifications_state", "notifications")
    op.drop_table("notifications")
    op.drop_index("ix_jobs_run_id", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for col in ("run_id", "datastore", "wait_reason", "priority"):
            batch.drop_column(col)
    op.drop_table("backup_job_runs")
    op.drop_table("backup_jobs")
    op.drop_table("pools")
