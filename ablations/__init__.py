"""The ablation suite: every ablation table of the Mask2Former paper as a declarative spec
(``ablations/specs/*.toml``), a resumable runner that appends one JSON record per finished run, and
renderers that put our numbers beside the paper's.

    python -m ablations list
    python -m ablations run masked_attention [--scale smoke|cpu|paper] [--seeds N] [--jobs N]
    python -m ablations report [NAME ...]
"""
from ablations.spec import AblationSpec, Row, list_specs, load_spec  # noqa: F401
