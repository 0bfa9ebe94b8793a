"""``e2ip data``: convert structure files to e2ip's HDF5 format, describe such a file."""

from __future__ import annotations

from e2ip.cli.common import add_read_options

NAME = "data"


def add_parser(subparsers) -> None:
    """The `e2ip data` sub-command's arguments."""
    p = subparsers.add_parser("data", help="on-disk data sets: convert data files to HDF5, describe one")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{convert,info}")
    q = data_sub.add_parser("convert", help="write data files into one HDF5 file (eV, Å) that "
                            "training reads lazily (data.train: FILE.h5)")
    q.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="data files (extxyz or anything ASE reads, npz, or .h5)")
    q.add_argument("--out", required=True, help="the HDF5 file to write (.h5 or .hdf5)")
    add_read_options(q, batch_size=False)
    q.add_argument("--allow-duplicates", action="store_true",
                   help="keep frames that repeat an earlier one (default: an error naming both)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (atomically, once the new file is complete)")
    q.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip",
                   help="gzip (default, any HDF5 tool reads it), lzf (h5py only) or none")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = data_sub.add_parser("info", help="describe an HDF5 file written by e2ip data convert")
    q.add_argument("file", help="the .h5 file")


def run(args) -> int:
    from e2ip.data.convert import convert, describe, human_size

    if args.data_command == "info":
        print(describe(args.file))
        return 0
    summary = convert(args.inputs, args.out, energy_key=args.energy_key,
                      forces_key=args.forces_key, energy_unit=args.energy_unit,
                      length_unit=args.length_unit, index=args.index,
                      allow_duplicates=args.allow_duplicates, overwrite=args.overwrite,
                      compression=args.compression, progress=not args.no_progress)
    from ase.data import chemical_symbols

    elements = ", ".join(chemical_symbols[z] for z in summary.elements)
    print(f"wrote {summary.path}: {summary.n_frames} frames, {summary.n_atoms} atoms "
          f"({elements}), {human_size(summary.size_bytes)}")
    return 0
