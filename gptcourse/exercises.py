"""The graded exercises, under their first name: gptcourse.exercises is
gptcourse.grading.exercises (the references, Case, Exercise, EXERCISES), kept
so that `from gptcourse.exercises import EXERCISES` and the like still work."""
from .grading.exercises import *  # noqa: F401,F403
from .grading.exercises import __all__  # noqa: F401
