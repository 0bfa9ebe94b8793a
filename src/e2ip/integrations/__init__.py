"""e2ip inside other codes: the ASE calculator (every model kind, with force covariances)."""
