"""`python -m cdm_ood.cli` (used by torchrun) runs the same click app as `cdm-ood`."""

from cdm_ood.cli import main

main()
