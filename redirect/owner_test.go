package redirect

func helperOwner() {}
