"""The library as a cache at farm scale: lookup columns, pins, placement, job metrics.

``fragments.prompt_hash`` (sha256 of the normalised prompt) and ``fragments.prompt_embedding``
(float32 bytes) make exact and similar lookups queries instead of manifest reads
(``ix_fragments_changes`` lets the similar-prompt index refresh only what changed);
``pinned`` exempts a fragment from the size cap's eviction; ``placement`` says whether it is
in the shared library or kept node-local; ``generation_jobs.metrics`` records what a job
measured and the memory steps it took. Existing fragments get their prompt hash here; their
embeddings are filled from their manifests on first lookup.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 13:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fragjobs.keys import prompt_hash

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("fragments") as batch:
        batch.add_column(sa.Column("prompt_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("prompt_embedding", sa.LargeBinary(), nullable=True))
        batch.add_column(
            sa.Column("pinned", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(
            sa.Column(
                "placement",
                sa.String(length=16),
                server_default=sa.text("'shared'"),
                nullable=False,
            )
        )
        batch.create_check_constraint(
            op.f("ck_fragments_placement"), "placement IN ('shared', 'local')"
        )
        batch.create_index(
            op.f("ix_fragments_lookup"), ["base_model_id", "status", "prompt_hash"], unique=False
        )
        batch.create_index(
            op.f("ix_fragments_changes"), ["base_model_id", "updated_at"], unique=False
        )
    with op.batch_alter_table("generation_jobs") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=True))

    fragments = sa.table(
        "fragments",
        sa.column("id", sa.Integer),
        sa.column("prompt", sa.Text),
        sa.column("prompt_hash", sa.String),
    )
    bind = op.get_bind()
    for row_id, prompt in bind.execute(sa.select(fragments.c.id, fragments.c.prompt)).all():
        bind.execute(
            fragments.update()
            .where(fragments.c.id == row_id)
            .values(prompt_hash=prompt_hash(prompt))
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("generation_jobs") as batch:
        batch.drop_column("metrics")
    with op.batch_alter_table("fragments") as batch:
        batch.drop_index(op.f("ix_fragments_changes"))
        batch.drop_index(op.f("ix_fragments_lookup"))
        batch.drop_constraint(op.f("ck_fragments_placement"), type_="check")
        batch.drop_column("placement")
        batch.drop_column("pinned")
        batch.drop_column("prompt_embedding")
        batch.drop_column("prompt_hash")
