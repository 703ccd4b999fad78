"""Model registries: CIFAR-zoo students, converted teachers, and the distillation heads."""

from ega_jax.models.students import STUDENT_NAMES, create_student, student_feature_dim
from ega_jax.models.teachers import TEACHER_SPECS, TeacherSpec, create_teacher, load_teacher

__all__ = [
  "STUDENT_NAMES",
  "create_student",
  "student_feature_dim",
  "TEACHER_SPECS",
  "TeacherSpec",
  "create_teacher",
  "load_teacher",
]
