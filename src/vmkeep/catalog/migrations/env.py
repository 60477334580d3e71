"""Alembic environment: vmkeep passes its own connection in ``config.attributes``."""

from alembic import context

from vmkeep.catalog.tables import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - vmkeep always passes one
    raise RuntimeError("vmkeep migrations run through vmkeep.catalog.Catalog.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
