"""One process of the two-process test in test_train.py (run as a script, not by pytest).

Usage: multihost_worker.py PROCESS_INDEX PORT WORKDIR
"""

import os
import sys

import jax
import numpy as np


def main(process_index: int, port: int, workdir: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_num_cpu_devices', 2)
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_index)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import test_train  # pylint: disable=g-import-not-at-top
  state = test_train.run(test_train.sharding_test_config(), workdir)
  # Parameters are replicated: this process's copy is the whole array.
  params = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  np.savez(os.path.join(workdir, f'params_{process_index}.npz'), *params)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
