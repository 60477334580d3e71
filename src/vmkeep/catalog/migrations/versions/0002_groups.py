"""groups: ordered members, group backups (one restore point per group) and their members"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "group_members",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("group_id", sa.Integer, sa.ForeignKey("groups.id"), nullable=False),
        sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("stop_position", sa.Integer, nullable=True),
        sa.UniqueConstraint("group_id", "vm_id"),
    )
    op.create_table(
        "group_backups",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("group_id", sa.Integer, sa.ForeignKey("groups.id"), nullable=False),
        sa.Column("datastore_id", sa.Integer, sa.ForeignKey("datastores.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("parallel_freeze", sa.Boolean, nullable=False),
        sa.Column("freeze_window_ms", sa.Float, nullable=True),
        sa.Column("failed_vm", sa.String(255), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=True),
    )
    op.create_table(
        "group_backup_members",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("group_backup_id", sa.Integer, sa.ForeignKey("group_backups.id"), nullable=False),
        sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("backup_id", sa.Integer, sa.ForeignKey("backups.id"), nullable=True),
        sa.Column("seq", sa.Integer, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("consistency", sa.String(16), nullable=True),
        sa.Column("frozen_at_ms", sa.Float, nullable=True),
        sa.Column("thawed_at_ms", sa.Float, nullable=True),
        sa.Column("freeze_ms", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )


def downgrade() -> None:
    for table in ("group_backup_members", "group_backups", "group_members", "groups"):
        op.drop_table(table)
