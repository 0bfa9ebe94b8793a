"""Readers of the file formats e2ip takes: anything ASE reads (extended XYZ first), rMD17 and
sGDML npz, and e2ip's own HDF5 structure sets.
"""
