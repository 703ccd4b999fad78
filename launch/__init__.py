"""User commands: python -m launch.convert_teacher, python -m launch.cache_teacher."""
