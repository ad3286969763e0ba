"""saelib: the code behind the replication of "Does higher interpretability imply better utility?
A Pairwise Analysis on Sparse Autoencoders" (Wang et al., ICLR 2026).

One module per concept (see README.md, "Where things live"). Notebooks in ``notebooks/`` stay thin
and call these functions; ``python -m saelib.grid`` runs them for every configuration of a profile.
"""

__version__ = "0.1.0"
