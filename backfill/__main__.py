from backfill.startup import main

main()
