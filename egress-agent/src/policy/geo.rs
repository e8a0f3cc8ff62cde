//! ISO 3166-1 alpha-2 countries, the continent GeoIP databases place each
//! in, and the compact country ids the dataplane uses (0 = unknown).
//! Generated once from the pycountry and pycountry-convert data sets
//! (with Kosovo's user-assigned XK, which GeoIP databases use).

use super::model::{Continent, CountryCode};

/// Code, English name, continent; sorted by code. A country's dataplane id
/// is its position here plus one.
pub const COUNTRIES: &[(&str, &str, Continent)] = &[
    ("AD", "Andorra", Continent::Eu),
    ("AE", "United Arab Emirates", Continent::As),
    ("AF", "Afghanistan", Continent::As),
    ("AG", "Antigua and Barbuda", Continent::Na),
    ("AI", "Anguilla", Continent::Na),
    ("AL", "Albania", Continent::Eu),
    ("AM", "Armenia", Continent::As),
    ("AO", "Angola", Continent::Af),
    ("AQ", "Antarctica", Continent::An),
    ("AR", "Argentina", Continent::Sa),
    ("AS", "American Samoa", Continent::Oc),
    ("AT", "Austria", Continent::Eu),
    ("AU", "Australia", Continent::Oc),
    ("AW", "Aruba", Continent::Na),
    ("AX", "Åland Islands", Continent::Eu),
    ("AZ", "Azerbaijan", Continent::As),
    ("BA", "Bosnia and Herzegovina", Continent::Eu),
    ("BB", "Barbados", Continent::Na),
    ("BD", "Bangladesh", Continent::As),
    ("BE", "Belgium", Continent::Eu),
    ("BF", "Burkina Faso", Continent::Af),
    ("BG", "Bulgaria", Continent::Eu),
    ("BH", "Bahrain", Continent::As),
    ("BI", "Burundi", Continent::Af),
    ("BJ", "Benin", Continent::Af),
    ("BL", "Saint Barthélemy", Continent::Na),
    ("BM", "Bermuda", Continent::Na),
    ("BN", "Brunei Darussalam", Continent::As),
    ("BO", "Bolivia", Continent::Sa),
    ("BQ", "Bonaire, Sint Eustatius and Saba", Continent::Na),
    ("BR", "Brazil", Continent::Sa),
    ("BS", "Bahamas", Continent::Na),
    ("BT", "Bhutan", Continent::As),
    ("BV", "Bouvet Island", Continent::An),
    ("BW", "Botswana", Continent::Af),
    ("BY", "Belarus", Continent::Eu),
    ("BZ", "Belize", Continent::Na),
    ("CA", "Canada", Continent::Na),
    ("CC", "Cocos (Keeling) Islands", Continent::As),
    ("CD", "Congo, The Democratic Republic of the", Continent::Af),
    ("CF", "Central African Republic", Continent::Af),
    ("CG", "Congo", Continent::Af),
    ("CH", "Switzerland", Continent::Eu),
    ("CI", "Côte d'Ivoire", Continent::Af),
    ("CK", "Cook Islands", Continent::Oc),
    ("CL", "Chile", Continent::Sa),
    ("CM", "Cameroon", Continent::Af),
    ("CN", "China", Continent::As),
    ("CO", "Colombia", Continent::Sa),
    ("CR", "Costa Rica", Continent::Na),
    ("CU", "Cuba", Continent::Na),
    ("CV", "Cabo Verde", Continent::Af),
    ("CW", "Curaçao", Continent::Na),
    ("CX", "Christmas Island", Continent::As),
    ("CY", "Cyprus", Continent::As),
    ("CZ", "Czechia", Continent::Eu),
    ("DE", "Germany", Continent::Eu),
    ("DJ", "Djibouti", Continent::Af),
    ("DK", "Denmark", Continent::Eu),
    ("DM", "Dominica", Continent::Na),
    ("DO", "Dominican Republic", Continent::Na),
    ("DZ", "Algeria", Continent::Af),
    ("EC", "Ecuador", Continent::Sa),
    ("EE", "Estonia", Continent::Eu),
    ("EG", "Egypt", Continent::Af),
    ("EH", "Western Sahara", Continent::Af),
    ("ER", "Eritrea", Continent::Af),
    ("ES", "Spain", Continent::Eu),
    ("ET", "Ethiopia", Continent::Af),
    ("FI", "Finland", Continent::Eu),
    ("FJ", "Fiji", Continent::Oc),
    ("FK", "Falkland Islands (Malvinas)", Continent::Sa),
    ("FM", "Micronesia, Federated States of", Continent::Oc),
    ("FO", "Faroe Islands", Continent::Eu),
    ("FR", "France", Continent::Eu),
    ("GA", "Gabon", Continent::Af),
    ("GB", "United Kingdom", Continent::Eu),
    ("GD", "Grenada", Continent::Na),
    ("GE", "Georgia", Continent::As),
    ("GF", "French Guiana", Continent::Sa),
    ("GG", "Guernsey", Continent::Eu),
    ("GH", "Ghana", Continent::Af),
    ("GI", "Gibraltar", Continent::Eu),
    ("GL", "Greenland", Continent::Na),
    ("GM", "Gambia", Continent::Af),
    ("GN", "Guinea", Continent::Af),
    ("GP", "Guadeloupe", Continent::Na),
    ("GQ", "Equatorial Guinea", Continent::Af),
    ("GR", "Greece", Continent::Eu),
    (
        "GS",
        "South Georgia and the South Sandwich Islands",
        Continent::An,
    ),
    ("GT", "Guatemala", Continent::Na),
    ("GU", "Guam", Continent::Oc),
    ("GW", "Guinea-Bissau", Continent::Af),
    ("GY", "Guyana", Continent::Sa),
    ("HK", "Hong Kong", Continent::As),
    ("HM", "Heard Island and McDonald Islands", Continent::An),
    ("HN", "Honduras", Continent::Na),
    ("HR", "Croatia", Continent::Eu),
    ("HT", "Haiti", Continent::Na),
    ("HU", "Hungary", Continent::Eu),
    ("ID", "Indonesia", Continent::As),
    ("IE", "Ireland", Continent::Eu),
    ("IL", "Israel", Continent::As),
    ("IM", "Isle of Man", Continent::Eu),
    ("IN", "India", Continent::As),
    ("IO", "British Indian Ocean Territory", Continent::As),
    ("IQ", "Iraq", Continent::As),
    ("IR", "Iran", Continent::As),
    ("IS", "Iceland", Continent::Eu),
    ("IT", "Italy", Continent::Eu),
    ("JE", "Jersey", Continent::Eu),
    ("JM", "Jamaica", Continent::Na),
    ("JO", "Jordan", Continent::As),
    ("JP", "Japan", Continent::As),
    ("KE", "Kenya", Continent::Af),
    ("KG", "Kyrgyzstan", Continent::As),
    ("KH", "Cambodia", Continent::As),
    ("KI", "Kiribati", Continent::Oc),
    ("KM", "Comoros", Continent::Af),
    ("KN", "Saint Kitts and Nevis", Continent::Na),
    ("KP", "North Korea", Continent::As),
    ("KR", "South Korea", Continent::As),
    ("KW", "Kuwait", Continent::As),
    ("KY", "Cayman Islands", Continent::Na),
    ("KZ", "Kazakhstan", Continent::As),
    ("LA", "Laos", Continent::As),
    ("LB", "Lebanon", Continent::As),
    ("LC", "Saint Lucia", Continent::Na),
    ("LI", "Liechtenstein", Continent::Eu),
    ("LK", "Sri Lanka", Continent::As),
    ("LR", "Liberia", Continent::Af),
    ("LS", "Lesotho", Continent::Af),
    ("LT", "Lithuania", Continent::Eu),
    ("LU", "Luxembourg", Continent::Eu),
    ("LV", "Latvia", Continent::Eu),
    ("LY", "Libya", Continent::Af),
    ("MA", "Morocco", Continent::Af),
    ("MC", "Monaco", Continent::Eu),
    ("MD", "Moldova", Continent::Eu),
    ("ME", "Montenegro", Continent::Eu),
    ("MF", "Saint Martin (French part)", Continent::Na),
    ("MG", "Madagascar", Continent::Af),
    ("MH", "Marshall Islands", Continent::Oc),
    ("MK", "North Macedonia", Continent::Eu),
    ("ML", "Mali", Continent::Af),
    ("MM", "Myanmar", Continent::As),
    ("MN", "Mongolia", Continent::As),
    ("MO", "Macao", Continent::As),
    ("MP", "Northern Mariana Islands", Continent::Oc),
    ("MQ", "Martinique", Continent::Na),
    ("MR", "Mauritania", Continent::Af),
    ("MS", "Montserrat", Continent::Na),
    ("MT", "Malta", Continent::Eu),
    ("MU", "Mauritius", Continent::Af),
    ("MV", "Maldives", Continent::As),
    ("MW", "Malawi", Continent::Af),
    ("MX", "Mexico", Continent::Na),
    ("MY", "Malaysia", Continent::As),
    ("MZ", "Mozambique", Continent::Af),
    ("NA", "Namibia", Continent::Af),
    ("NC", "New Caledonia", Continent::Oc),
    ("NE", "Niger", Continent::Af),
    ("NF", "Norfolk Island", Continent::Oc),
    ("NG", "Nigeria", Continent::Af),
    ("NI", "Nicaragua", Continent::Na),
    ("NL", "Netherlands", Continent::Eu),
    ("NO", "Norway", Continent::Eu),
    ("NP", "Nepal", Continent::As),
    ("NR", "Nauru", Continent::Oc),
    ("NU", "Niue", Continent::Oc),
    ("NZ", "New Zealand", Continent::Oc),
    ("OM", "Oman", Continent::As),
    ("PA", "Panama", Continent::Na),
    ("PE", "Peru", Continent::Sa),
    ("PF", "French Polynesia", Continent::Oc),
    ("PG", "Papua New Guinea", Continent::Oc),
    ("PH", "Philippines", Continent::As),
    ("PK", "Pakistan", Continent::As),
    ("PL", "Poland", Continent::Eu),
    ("PM", "Saint Pierre and Miquelon", Continent::Na),
    ("PN", "Pitcairn", Continent::Oc),
    ("PR", "Puerto Rico", Continent::Na),
    ("PS", "Palestine, State of", Continent::As),
    ("PT", "Portugal", Continent::Eu),
    ("PW", "Palau", Continent::Oc),
    ("PY", "Paraguay", Continent::Sa),
    ("QA", "Qatar", Continent::As),
    ("RE", "Réunion", Continent::Af),
    ("RO", "Romania", Continent::Eu),
    ("RS", "Serbia", Continent::Eu),
    ("RU", "Russian Federation", Continent::Eu),
    ("RW", "Rwanda", Continent::Af),
    ("SA", "Saudi Arabia", Continent::As),
    ("SB", "Solomon Islands", Continent::Oc),
    ("SC", "Seychelles", Continent::Af),
    ("SD", "Sudan", Continent::Af),
    ("SE", "Sweden", Continent::Eu),
    ("SG", "Singapore", Continent::As),
    (
        "SH",
        "Saint Helena, Ascension and Tristan da Cunha",
        Continent::Af,
    ),
    ("SI", "Slovenia", Continent::Eu),
    ("SJ", "Svalbard and Jan Mayen", Continent::Eu),
    ("SK", "Slovakia", Continent::Eu),
    ("SL", "Sierra Leone", Continent::Af),
    ("SM", "San Marino", Continent::Eu),
    ("SN", "Senegal", Continent::Af),
    ("SO", "Somalia", Continent::Af),
    ("SR", "Suriname", Continent::Sa),
    ("SS", "South Sudan", Continent::Af),
    ("ST", "Sao Tome and Principe", Continent::Af),
    ("SV", "El Salvador", Continent::Na),
    ("SX", "Sint Maarten (Dutch part)", Continent::Na),
    ("SY", "Syria", Continent::As),
    ("SZ", "Eswatini", Continent::Af),
    ("TC", "Turks and Caicos Islands", Continent::Na),
    ("TD", "Chad", Continent::Af),
    ("TF", "French Southern Territories", Continent::An),
    ("TG", "Togo", Continent::Af),
    ("TH", "Thailand", Continent::As),
    ("TJ", "Tajikistan", Continent::As),
    ("TK", "Tokelau", Continent::Oc),
    ("TL", "Timor-Leste", Continent::As),
    ("TM", "Turkmenistan", Continent::As),
    ("TN", "Tunisia", Continent::Af),
    ("TO", "Tonga", Continent::Oc),
    ("TR", "Türkiye", Continent::As),
    ("TT", "Trinidad and Tobago", Continent::Na),
    ("TV", "Tuvalu", Continent::Oc),
    ("TW", "Taiwan", Continent::As),
    ("TZ", "Tanzania", Continent::Af),
    ("UA", "Ukraine", Continent::Eu),
    ("UG", "Uganda", Continent::Af),
    ("UM", "United States Minor Outlying Islands", Continent::Oc),
    ("US", "United States", Continent::Na),
    ("UY", "Uruguay", Continent::Sa),
    ("UZ", "Uzbekistan", Continent::As),
    ("VA", "Holy See (Vatican City State)", Continent::Eu),
    ("VC", "Saint Vincent and the Grenadines", Continent::Na),
    ("VE", "Venezuela", Continent::Sa),
    ("VG", "Virgin Islands, British", Continent::Na),
    ("VI", "Virgin Islands, U.S.", Continent::Na),
    ("VN", "Vietnam", Continent::As),
    ("VU", "Vanuatu", Continent::Oc),
    ("WF", "Wallis and Futuna", Continent::Oc),
    ("WS", "Samoa", Continent::Oc),
    ("XK", "Kosovo", Continent::Eu),
    ("YE", "Yemen", Continent::As),
    ("YT", "Mayotte", Continent::Af),
    ("ZA", "South Africa", Continent::Af),
    ("ZM", "Zambia", Continent::Af),
    ("ZW", "Zimbabwe", Continent::Af),
];

/// Largest country id (ids are `1..=MAX_COUNTRY_ID`, 0 is "unknown").
pub const MAX_COUNTRY_ID: u16 = COUNTRIES.len() as u16;

/// A country by its code (any case).
pub fn lookup(code: &str) -> Option<(CountryCode, &'static str, Continent)> {
    let upper = code.to_ascii_uppercase();
    COUNTRIES
        .binary_search_by(|(c, _, _)| (*c).cmp(upper.as_str()))
        .ok()
        .map(|i| {
            let (c, name, continent) = COUNTRIES[i];
            let b = c.as_bytes();
            (CountryCode([b[0], b[1]]), name, continent)
        })
}

/// The dataplane id of a country (1-based), or `None` for an unassigned code.
pub fn country_id(code: CountryCode) -> Option<u16> {
    let text = code.to_string();
    COUNTRIES
        .binary_search_by(|(c, _, _)| (*c).cmp(text.as_str()))
        .ok()
        .map(|i| i as u16 + 1)
}

/// The country with dataplane id `id`.
pub fn by_id(id: u16) -> Option<(CountryCode, Continent)> {
    let (c, _, continent) = *COUNTRIES.get(usize::from(id).checked_sub(1)?)?;
    let b = c.as_bytes();
    Some((CountryCode([b[0], b[1]]), continent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geo_table_sorted_unique_and_ids_round_trip() {
        assert!(
            COUNTRIES.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, unique codes"
        );
        for id in 1..=MAX_COUNTRY_ID {
            let (code, _) = by_id(id).unwrap();
            assert_eq!(
                country_id(code),
                Some(id),
                "id {id} round-trips through {code}"
            );
        }
    }

    #[test]
    fn geo_lookup_known_codes_and_continents() {
        assert_eq!(
            lookup("pt").unwrap().2,
            Continent::Eu,
            "Portugal is in Europe"
        );
        assert_eq!(lookup("IN").unwrap().2, Continent::As);
        assert_eq!(lookup("BR").unwrap().2, Continent::Sa);
        assert_eq!(lookup("AQ").unwrap().2, Continent::An);
        assert!(lookup("UK").is_none(), "UK is not an ISO code (GB is)");
    }
}
