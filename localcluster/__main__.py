import sys

from localcluster import main

sys.exit(main())
