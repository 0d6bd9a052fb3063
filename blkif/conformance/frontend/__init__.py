"""Frontend cases: the suite plays a backend for a frontend under test."""
