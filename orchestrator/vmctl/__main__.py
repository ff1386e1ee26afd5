from vmctl.entry import main

main()
