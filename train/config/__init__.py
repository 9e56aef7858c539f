"""The recipe, in one package: what a recipe may say and how it reaches every rank.

- ``recipe`` (with ``outputs`` and ``slurm``): the schema, one dataclass per section, a docstring
  per field, and ``resolve_defaults``, the one place defaults that depend on other settings are set;
- ``typed``: plain data → that dataclass tree, every problem at once, and ``RecipeError``, the one
  error type of bad input anywhere (the CLI exits 2 with it, a rank reports it and exits 2);
- ``loading``: YAML (strict: no duplicate keys, no alias bombs), dotted ``key=value`` overrides,
  then defaults, auto-fit and checks, in that order: ``load_recipe``;
- ``autofit``: the settings a recipe leaves to ``auto``, chosen from the memory plan;
- ``checks`` and ``model_checks``: the cross-field checks, run by the launcher and again by every
  rank on the ``recipe.yaml`` it reads; ``resume``: what a resume may not change.
"""
