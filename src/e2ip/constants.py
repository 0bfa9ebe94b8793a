"""Constants shared across the layers."""

#: Cartesian dimension: positions and forces are (N, DIM), force covariances (N, DIM, DIM)
DIM = 3
