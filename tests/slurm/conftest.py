from tests.helpers.slurm_cluster import slurm_cluster  # noqa: F401  (the module-scoped cluster fixture)
