"""``python -m hf_cka`` runs the ``hf-cka`` command line (also under ``accelerate launch -m``)."""

from hf_cka.cli import main

raise SystemExit(main())
