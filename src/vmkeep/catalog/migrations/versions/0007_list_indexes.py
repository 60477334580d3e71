"""indexes for list queries at scale: a VM's backups, a backup's drills and group points"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_backups_vm_id", "backups", ["vm_id"]),
    ("ix_drills_increment_id", "drills", ["increment_id"]),
    ("ix_group_backup_members_backup_id", "group_backup_members", ["backup_id"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in INDEXES:
        op.drop_index(name, table)
