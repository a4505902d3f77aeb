# Makes `recipes/` a package of its own: torchtune's wheel installs a top-level
# `recipes` package whose __init__ raises, and ours must shadow it.
