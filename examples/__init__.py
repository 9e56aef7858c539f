"""The demos' data builders (run from the repository root as ``python -m examples.<name>``): not
part of the installed ``launch`` and ``train`` packages."""
