"""The library halves of the programs: `train.run` (train.py), `sample.run` (sample.py) and
`evaluate.run` (evaluate.py), and `workdir`, which loads what a training run left on disk.
Only this package and the programs import `jaxdiff.checkpoint`."""
