"""Neural-network building blocks shared by the backbones and heads: scatter sums over edges,
radial bases and cutoffs, MLPs, and the constant ``2e`` (rank-2) change of basis.
"""
