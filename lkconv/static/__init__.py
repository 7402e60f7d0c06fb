"""Static performance room: compile every GPU kernel without a GPU, read its SASS, model its time.

``python -m lkconv static`` (see :mod:`.report`).  Modules:

* :mod:`.kernels`  -- the one table "kernel symbol pattern -> (backend, passes, role)", the layer set,
  the Triton configurations that survive pruning and the runtime's specialisation of each launch;
* :mod:`.tools`    -- locating nvcc / ptxas / cuobjdump / nvdisasm, the on-disk cache;
* :mod:`.compile`  -- csrc/*.cu -> cubin per arch (flags from ``csrc/build_env.py``) and
  ``triton.compile(..., target=GPUTarget(...))`` per config;
* :mod:`.sass`     -- SASS parsing: resources, loops, the instruction mix of the hot loop;
* :mod:`.model`    -- floors and the throughput model (every number it produces is *modelled*);
* :mod:`.report`   -- tables, the results folder, calibration against measured times.

Nothing here needs a GPU; nothing here measures time.  Compiler facts are labelled
"measured-static", model outputs "modelled" (docs/performance_model.md).
"""
