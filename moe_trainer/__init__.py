"""Distributed Mixture-of-Experts training: everything that is not Ray-specific."""

import time

from moe_trainer.noise import silence_third_party

# When this process started using the package (the first import): "command to first step"
# is measured from here. Process creation times read from /proc drift on some VMs.
STARTED_AT = time.time()

silence_third_party()  # before any module of the package imports DeepSpeed, in the driver and in actors
