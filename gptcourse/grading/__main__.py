"""python -m gptcourse.grading grade SUBMISSIONS/ --out grades.csv (see gptcourse.grading.batch)."""
import sys

from .batch import main

sys.exit(main())
