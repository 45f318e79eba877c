"""Method names of the compatibility report, defined once.

A method is named `<query side>-><gallery side>`: `old->old` (the old model on the old gallery:
the floor), `new->new` (the gallery re-embedded: the ceiling), and every upgraded query against
the OLD gallery, `<name>->old` (method.md, "Evaluation protocol"). Report rows, MLflow metric
names (`xbt_ray.tracking.metric_name`), costs, plots and sweeps all use these strings.
"""
from __future__ import annotations

OLD_OLD = "old->old"
NEW_NEW = "new->new"
REFERENCES = (OLD_OLD, NEW_NEW)

XBT = "xbt->old"                          # faithful XBT (stage 1 + stage 2, old model absent)
XBT_ANCHORED = "xbt-anchored->old"        # stage 2 against cached old embeddings
XBT_STAGE1 = "xbt-stage1->old"            # psi after stage 1 alone
XBT_PSI = "xbt-psi->old"                  # sweep: psi-only stage 2, faithful
XBT_ANCHORED_PSI = "xbt-anchored-psi->old"  # sweep: psi-only stage 2, anchored

PROCRUSTES_FITS = ("text", "image", "both")   # what each Procrustes baseline is fitted on
RIDGE = "ridge->old"
SLERP = "slerp->old"                      # slerp with the alpha chosen on the support split
SLERP_MID = "slerp-mid->old"              # slerp at alpha 0.5


def against_old(name: str) -> str:
    """'mine' -> 'mine->old': a query method named without its gallery side searches the old
    gallery; a name that already says its sides is returned as is."""
    return name if "->" in name else f"{name}->old"


def procrustes(fit: str) -> str:
    """The Procrustes baseline fitted on `fit` (one of PROCRUSTES_FITS) pairs."""
    if fit not in PROCRUSTES_FITS:
        raise ValueError(f"Procrustes is fitted on one of {PROCRUSTES_FITS}, not {fit!r}")
    return f"procrustes-{fit}->old"


def xbt(objective: str) -> str:
    """The report row of a stage 2 with `objective` (faithful | anchored)."""
    return XBT_ANCHORED if objective == "anchored" else XBT
