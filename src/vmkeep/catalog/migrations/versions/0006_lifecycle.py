"""lifecycle: VM template / state file / created flag, action history, snapshots"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.tables import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("template", sa.Text, nullable=True))
        batch.add_column(sa.Column("state_file", sa.Text, nullable=True))
        batch.add_column(
            sa.Column("created", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("usage", sa.JSON, nullable=False, server_default="{}"))
    op.create_table(
        "vm_history",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("who", sa.String(255), nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=True),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "vm_snapshots",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("disk", sa.String(32), nullable=True),
        sa.Column("memory", sa.Boolean, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("vm_id", "seq"),
    )


def downgrade() -> None:
    op.drop_table("vm_snapshots")
    op.drop_table("vm_history")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("usage")
        batch.drop_column("created")
        batch.drop_column("state_file")
        batch.drop_column("template")
