"""snapshot names: the user's name of a VM snapshot (vm snapshot create VM NAME), unique per VM"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # existing snapshots stay unnamed (NULL): they are reached by their id, as before
    with op.batch_alter_table("vm_snapshots") as batch:
        batch.add_column(sa.Column("label", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_vm_snapshots_label", ["vm_id", "label"])


def downgrade() -> None:
    with op.batch_alter_table("vm_snapshots") as batch:
        batch.drop_constraint("uq_vm_snapshots_label", type_="unique")
        batch.drop_column("label")
