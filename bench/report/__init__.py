"""`attnbench report`: speed, train and distill sections, quality against speed, md/html render."""
