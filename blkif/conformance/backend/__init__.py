"""Backend cases: the suite plays a frontend (:mod:`.peer`) against VBDs a
:mod:`.session` provides; one module per clause group."""
