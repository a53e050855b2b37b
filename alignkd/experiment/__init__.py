"""The one experiment runner: arms x seeds -> distill -> eval -> mean ± sd table.

`alignkd demo`, bench/efficacy.py and bench/objective_sweep.py are thin callers of it:
`plan` names the students (arms, worlds, recipes, run directories), `stages` runs them
through the public CLI (cache build once per world, then distill and eval per student,
every stage skipped when its output exists), and `tables` turns the scores into tables.
"""
